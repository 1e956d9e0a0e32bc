"""FTS progress for the v1 API: the poller keeps FTS's view of a running job, and the job tells how far it is."""

import json

from tests.test_fts_mover import MoverTestCase
from transferd import jobs
from transferd.api_v1 import APIv1


class ProgressTests(MoverTestCase):
    async def test_progress_recorded_when_it_changes(self):
        """Each poll that finds a running FTS job further along records it in fts_details; one that does not writes nothing."""
        await self.start(duration=1, slow=["prod/b=100"])
        job = await self.staged(files=[("prod/a", 1, None), ("prod/b", 1, None)])
        await self.pipeline.transfer(job.job_id)
        self.clock.advance(2)  # prod/a is done, prod/b takes 100 s
        await self.poller.poll_once()
        got = await self.store.get(job.job_id)
        details = json.loads(got.fts_details)
        self.assertEqual((got.status, details["job_state"], sorted(f["file_state"] for f in details["files"])),
                         (jobs.TRANSFERRING, "ACTIVE", ["ACTIVE", "FINISHED"]))
        self.assertEqual(APIv1._transfer(got), "FTS job ACTIVE: 1 of 2 files done")
        self.clock.advance(5)
        await self.poller.poll_once()
        self.assertEqual((await self.store.get(job.job_id)).time_updated, got.time_updated)
        views = await self.poll_until_ended([job.job_id], step=20)
        self.assertEqual(views[job.job_id].status, jobs.SUCCESS)

"""Fair share and limits (transferd.scheduler): the water-filling, and the store's part on SQLite and MariaDB."""

from twisted.trial import unittest

from tests.contract_scheduling import SchedulingContract
from tests.stores import OnMariaDB, OnSQLite
from transferd.auth.access import Identity
from transferd.scheduler import Counts, Policy, allocate


class AllocateTests(unittest.TestCase):
    def test_equal_weights_fill_the_emptiest_first(self):
        counts = Counts(waiting={"A": 100, "B": 100}, released={}, running={"A": 6})
        self.assertEqual(allocate(8, counts, lambda share: 1.0), {"A": 1, "B": 7})

    def test_weights_share_in_proportion(self):
        counts = Counts(waiting={"A": 1000, "B": 1000}, released={}, running={})
        given = allocate(400, counts, {"A": 1.0, "B": 3.0}.get)
        self.assertEqual(given, {"A": 100, "B": 300})

    def test_demand_and_cap_bound_a_share(self):
        counts = Counts(waiting={"A": 2, "B": 100}, released={"B": 1}, running={})
        self.assertEqual(allocate(10, counts, lambda share: 1.0), {"A": 2, "B": 8})
        self.assertEqual(allocate(10, counts, lambda share: 1.0, cap=3), {"A": 2, "B": 2})

    def test_nothing_to_give(self):
        counts = Counts(waiting={"A": 5}, released={}, running={})
        self.assertEqual(allocate(0, counts, lambda share: 1.0), {})
        self.assertEqual(allocate(5, Counts({}, {}, {}), lambda share: 1.0), {})


class ShareTests(unittest.TestCase):
    def test_groups_by_identity_or_fqan_first_match_wins(self):
        policy = Policy(groups=(("production", "/meerkat/Role=production"), ("astro", "/meerkat"),
                                ("astro", "SUB=alice, ISS=https://iam.example.org")),
                        weights=((3.0, "production"),))
        producer = Identity("/DC=org/CN=Bot", "x509", ("/meerkat/Role=production/Capability=NULL",))
        member = Identity("/DC=org/CN=Bob", "x509", ("/meerkat",))
        self.assertEqual(policy.share_of(producer), "production")
        self.assertEqual(policy.share_of(member), "astro")
        self.assertEqual(policy.share_of(Identity("SUB=alice, ISS=https://iam.example.org", "token")), "astro")
        self.assertEqual(policy.share_of(Identity("/DC=org/CN=Carol", "x509")), "/DC=org/CN=Carol")
        self.assertEqual(policy.share_of(None), "anonymous")
        self.assertEqual((policy.weight("production"), policy.weight("astro")), (3.0, 1.0))


class SQLiteSchedulingTests(OnSQLite, SchedulingContract, unittest.TestCase):
    pass


class MariaDBSchedulingTests(OnMariaDB, SchedulingContract, unittest.TestCase):
    pass

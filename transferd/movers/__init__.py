"""Movers: deliver staged products to their destination (see transferd.interfaces.IMover)."""

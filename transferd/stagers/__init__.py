"""Stagers: bring archived products from tape to disk (see transferd.interfaces.IStager)."""

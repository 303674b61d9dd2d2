"""Internal implementation of coreunits; import from :mod:`coreunits` instead."""

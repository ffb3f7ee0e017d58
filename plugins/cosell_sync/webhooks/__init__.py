"""Partner Center webhook support: signature verification (receiver and registration follow)."""

"""The bundled demo: distil a digits MLP into a tiny student from a kdcache cache."""

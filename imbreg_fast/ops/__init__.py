"""Backend implementations and registered operators (internal; use imbreg_fast.functional / imbreg_fast.nn)."""

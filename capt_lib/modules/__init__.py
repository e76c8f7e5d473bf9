"""capt_lib.modules stage."""

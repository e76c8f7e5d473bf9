"""capt_lib.confusion stage."""

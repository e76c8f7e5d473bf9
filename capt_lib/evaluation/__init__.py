"""capt_lib.evaluation stage."""

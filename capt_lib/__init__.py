"""capt_lib: Confusion-Aware Prompt Tuning (CAPT) for CLIP models.

The package is organised as stages through which data flows one way:
``data`` -> ``backbones`` -> ``prompts`` -> ``confusion`` -> ``modules`` ->
``training`` -> ``evaluation`` -> ``runs``. A lower stage never imports a higher one.
"""

__version__ = "0.1.0"

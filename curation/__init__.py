"""Curation: clean and format domain corpora into TRL instruction and preference datasets.

Nothing here imports ``feedback`` or ``alignment``; heavy libraries (spaCy, lingua, datasets) load lazily."""

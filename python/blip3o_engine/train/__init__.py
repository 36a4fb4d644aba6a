"""Training the `demo` preset: BLIP3-o's sequential recipe at toy scale (see `recipe.py`)."""

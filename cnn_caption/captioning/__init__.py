"""Captioning building blocks below the tasks: the feature store, caption metrics, paired comparison of two runs."""

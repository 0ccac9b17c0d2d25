"""Measurement primitives: memory figures and the spread of repeats, the photo-z metrics, a run's
timeline, intervals with the model's error, the discrete-event simulation the estimate runs."""

"""Engine: pipeline templates and their execution."""

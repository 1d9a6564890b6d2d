"""Figures and ipywidgets explorers (drawing only: no logic that tests would need)."""

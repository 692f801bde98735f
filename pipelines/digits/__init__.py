"""The bundled digits pipeline: scikit-learn's 8x8 digits, a small CNN teacher, a tiny MLP student."""

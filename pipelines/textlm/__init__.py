"""The bundled byte-level LM pipeline: standard-library sources, a small causal transformer teacher and a 9.5x smaller student."""

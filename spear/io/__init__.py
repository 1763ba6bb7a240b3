"""File IO shared by the stages: atomic outputs, safetensors streaming, run artifacts."""

"""HF <-> jaxvlm weights."""

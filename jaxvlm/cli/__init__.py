"""The command-line tools: jaxvlm-train, jaxvlm-generate, jaxvlm-export (console scripts in pyproject.toml)."""

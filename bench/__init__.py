"""`make bench`: bare vLLM's OpenAI server vs this project's Serve app vs Ray Serve LLM, on the same
tiny model and engine settings. Run as `python -m bench` (see bench/run.py and bench/README.md)."""

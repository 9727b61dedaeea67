"""`python -m ollama_exporter` runs the same CLI as the `ollama-exporter` command."""

from ollama_exporter.cli import main

if __name__ == "__main__":
    main()

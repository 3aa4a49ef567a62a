"""The `product-studio` command line (Typer). Thin: parses, calls the pipeline, prints, exits."""

"""The `loraplex` command: argument parsing and dispatch above loraplex_api, the operator and the trainer."""

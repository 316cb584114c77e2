"""Architecture search with Optuna (``study``); README.md beside it describes the command."""

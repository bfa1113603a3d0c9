"""The demo: synthetic tasks, the character tokenizer, held-out evaluation and model cards of the demo models.

It uses `server` and `pattern_store`; they never import it (the one exception is `server/cli.py`, whose
`eval` and `chat` commands load it when they run), so the server installs and runs without the demo.
"""

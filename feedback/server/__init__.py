"""Code that runs INSIDE the Argilla server's own virtualenv (argilla-server==2.8.0).

Nothing in the main venv imports this package: ``feedback.server_ctl`` runs ``launcher.py`` as a script with the
server venv's Python, and the launcher puts this folder on ``sys.path`` so its siblings import as top-level modules
(``engine``, ``sql_query``). ``launcher.py`` (the CLI and its patches of argilla-server), ``engine.py`` (the search
engine) and ``sql_query.py`` (searches compiled to SQL) are the only modules that import ``argilla_server``.
"""

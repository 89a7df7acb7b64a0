"""Code that runs INSIDE the Argilla server's own virtualenv (argilla-server==2.8.0).

Nothing in the main venv imports this package: ``feedback.server_ctl`` runs ``launcher.py`` as a script with the
server venv's Python. ``engine.py`` is the only module that imports ``argilla_server``.
"""

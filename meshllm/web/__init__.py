"""The web dashboard every node serves at ``/``: static files (``static/``, no build step, nothing
fetched from the internet) and the JSON they poll (``GET /v1/dashboard``). See docs/dashboard.md."""

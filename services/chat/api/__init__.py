"""The chat service's HTTP edge: dependencies (`deps.py`), error answers (`errors.py`), one router per
topic (`routes/`), and the app that assembles them (`services/chat/app.py`). Routes only translate."""

"""gunicorn's entry point: `gunicorn wsgi:app` (see gunicorn.conf.py)."""
from dotenv import load_dotenv

load_dotenv()  # the flask CLI reads .env itself; gunicorn does not

from chatbot import create_app  # noqa: E402

app = create_app()

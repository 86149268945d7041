from whisper_flask import create_app

app = create_app()

"""The application's secrets: the encrypted .env bundle (``bundle``)."""

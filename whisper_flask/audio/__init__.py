"""Audio in: probing and decoding with ffprobe and ffmpeg, fetching URLs with every address checked.

May import only the shared modules (exceptions, settings, files).
"""

"""Audio in: probing, decoding and fetching with ffmpeg, ffprobe and checked URLs."""

"""The service's face (face.py), the parts it is built from (compose.py) and their lifecycle.

May import notify, access, jobs, engine, audio and the shared modules; never Flask (ARCHITECTURE.md, "Layers").
"""

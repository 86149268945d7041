"""The service's face and the parts it is built from (ARCHITECTURE.md, "Rooms")."""

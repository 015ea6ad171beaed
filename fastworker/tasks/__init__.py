"""Task definitions, the user-facing models and the payload serializer."""

"""The search service (`duch serve`): a FastAPI app over an encoded archive, with a web page (static/)."""

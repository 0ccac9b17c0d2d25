"""What a person sees: terminal tables, progress and help; the figures; the HTML report of a store."""

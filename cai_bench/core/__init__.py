"""The ground floor: errors, choices, shapes, files and AWS settings; the plan of a run; the records it
writes and the machine they name. Everything else may import it; it imports nothing of the package above it."""

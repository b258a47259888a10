"""Development and test tools that are never deployed: stand-ins for what only AWS runs."""

"""Reading, checking and splitting labeled text data."""

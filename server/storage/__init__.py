"""Storage: the interface every backend implements, the records it keeps, and the SQLite
backend."""

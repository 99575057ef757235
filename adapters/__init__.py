"""shir.adapters: real I/O around the pure core (files, Blob, Service Bus, ODBC, DPAPI)."""

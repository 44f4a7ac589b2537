"""The hq broker: a ROUTER frontend for clients, a ROUTER backend for workers, and the
scheduler that splits batches into chunks and shares the workers fairly between clients."""

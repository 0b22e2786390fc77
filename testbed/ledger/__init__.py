"""Permissioned Proof-of-Energy ledger (Siano et al. 2019, sec. V.E-V.F).

Rooms: `canonical` (bytes that get hashed and signed), `identity` (Ed25519 keys,
addresses, pseudonyms), `messages` (the paper's signed JSON envelope), `transactions`
(operation schemas), `state` (registry, wallets, auctions: the rules), `election` (PoE),
`blocks` (headers, Merkle root, votes, commit certificates), `contracts`, `chain`
(validation and genesis), `store` (SQLite), `node` (a validator on the message bus).
"""

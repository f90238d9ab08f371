#!/usr/bin/env python3
"""Regenerates fuzz/seeds/ from fuzz/fixtures/ (needs python3 and openssl).

The seeds are small valid inputs, one or two per target, so the fuzzers start
past the parsers' first checks. Run from anywhere: python3 fuzz/gen_seeds.py
"""
import base64, json, os, subprocess, struct

HERE = os.path.dirname(os.path.abspath(__file__))
FX = os.path.join(HERE, "fixtures")
SEEDS = os.path.join(HERE, "seeds")
NOW = 1_830_000_000  # the fixed validation time in the jwt_svid / x509_svid targets


def fx(name):
    with open(os.path.join(FX, name), "rb") as f:
        return f.read()


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt_point():
    spki = subprocess.run(
        ["openssl", "pkey", "-inform", "DER", "-in", os.path.join(FX, "jwt_key.pk8"),
         "-pubout", "-outform", "DER"], check=True, capture_output=True).stdout
    return spki[-65:]


def der_int(b, i):
    assert b[i] == 2
    n = b[i + 1]
    return int.from_bytes(b[i + 2:i + 2 + n], "big"), i + 2 + n


def es256(msg):
    der = subprocess.run(
        ["openssl", "dgst", "-sha256", "-keyform", "DER", "-sign", os.path.join(FX, "jwt_key.pk8")],
        input=msg, check=True, capture_output=True).stdout
    assert der[0] == 0x30
    r, i = der_int(der, 2)
    s, _ = der_int(der, i)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# spiffe_id
write("spiffe_id", "id", "spiffe://example.org/ns/prod/agent")
write("spiffe_id", "td", "spiffe://example.org")

# bundle
pt = jwt_point()
jwk = {"kty": "EC", "crv": "P-256", "kid": "k1", "x": b64url(pt[1:33]), "y": b64url(pt[33:])}
ca = fx("ca.der")
write("bundle", "spiffe.json", json.dumps({
    "keys": [dict(jwk, use="jwt-svid"),
             {"use": "x509-svid", "x5c": [base64.b64encode(ca).decode()]}],
    "spiffe_sequence": 1, "spiffe_refresh_hint": 300}))
write("bundle", "jwks.json", json.dumps({"keys": [jwk]}))
b = base64.b64encode(ca).decode()
write("bundle", "ca.pem", "-----BEGIN CERTIFICATE-----\n"
      + "\n".join(b[i:i + 64] for i in range(0, len(b), 64)) + "\n-----END CERTIFICATE-----\n")

# jwt_svid: structured (mode byte odd) and raw (mode byte even)
header = json.dumps({"alg": "ES256", "kid": "k1", "typ": "JWT"}, separators=(",", ":")).encode()
claims = json.dumps({"sub": "spiffe://example.org/w", "aud": "tool", "exp": NOW + 300,
                     "iat": NOW, "jti": "j"}, separators=(",", ":")).encode()
write("jwt_svid", "structured", bytes([1, len(header)]) + header + claims)
signing_input = (b64url(header) + "." + b64url(claims)).encode()
token = signing_input.decode() + "." + b64url(es256(signing_input))
write("jwt_svid", "raw", b"\x00" + token.encode())

# x509_svid: u16 LE chain length, chain, PKCS#8 key
for name, chain, key in [
        ("leaf", fx("leaf.der"), fx("leaf_key.pk8")),
        ("intermediate", fx("leaf_via_intermediate.der") + fx("intermediate.der"),
         fx("leaf_via_intermediate_key.pk8"))]:
    write("x509_svid", name, struct.pack("<H", len(chain)) + chain + key)

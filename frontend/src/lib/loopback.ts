/**
 * Whether a URL's hostname is this machine: `localhost` and its subdomains (RFC 6761, which browsers
 * resolve to loopback themselves), `[::1]` and 127.0.0.0/8. Plain http and ws are allowed only there
 * (the local app and the sign-in stand-in), for the socket (config.ts) and for sign-in (signIn.ts) alike.
 */
export function isLoopback(hostname: string): boolean {
  return hostname === "localhost" || hostname.endsWith(".localhost") || hostname === "[::1]" || /^127(\.\d{1,3}){3}$/.test(hostname);
}

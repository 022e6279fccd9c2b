/** `supermachine serve`: the HTTP/WebSocket server (docs/server.md). */

export { jsonLogger, type LogFn, type LogLevel } from "./log.ts";
export { ROUTES } from "./routes.ts";
export { type DeclaredPool, newToken, type ServeOptions, SupermachineServer, startServer } from "./server.ts";

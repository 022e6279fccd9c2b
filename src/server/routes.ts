/** Every route of the API (docs/server.md; docs/openapi.json lists the same). */

import { execOnPool, execOnVm, execStream } from "./exec-routes.ts";
import { fsCallRoute, readFileRoute, watchStream, writeFileRoute } from "./file-routes.ts";
import { proxyHttp, tcpStream } from "./port-routes.ts";
import type { Route } from "./router.ts";
import {
  bakeSnapshot,
  deleteSnapshot,
  getHealthz,
  getInfo,
  getMetrics,
  getReadyz,
  getSnapshot,
  listImages,
  listSnapshots,
  pullImage,
} from "./store-routes.ts";
import {
  acquire,
  createPool,
  createVm,
  deletePool,
  deleteVm,
  getPool,
  getVm,
  listPools,
  listVms,
  pingVm,
} from "./vm-routes.ts";

export const ROUTES: readonly Route[] = [
  { method: "GET", path: "/healthz", public: true, handler: getHealthz },
  { method: "GET", path: "/readyz", public: true, handler: getReadyz },
  { method: "GET", path: "/metrics", public: true, handler: getMetrics },
  { method: "GET", path: "/v1/info", handler: getInfo },
  { method: "GET", path: "/v1/images", handler: listImages },
  { method: "POST", path: "/v1/images/pull", handler: pullImage },
  { method: "GET", path: "/v1/snapshots", handler: listSnapshots },
  { method: "POST", path: "/v1/snapshots", handler: bakeSnapshot },
  { method: "GET", path: "/v1/snapshots/{name}", handler: getSnapshot },
  { method: "DELETE", path: "/v1/snapshots/{name}", handler: deleteSnapshot },
  { method: "GET", path: "/v1/pools", handler: listPools },
  { method: "POST", path: "/v1/pools", handler: createPool },
  { method: "GET", path: "/v1/pools/{id}", handler: getPool },
  { method: "DELETE", path: "/v1/pools/{id}", handler: deletePool },
  { method: "POST", path: "/v1/pools/{id}/acquire", handler: acquire },
  { method: "POST", path: "/v1/pools/{id}/exec", handler: execOnPool },
  { method: "GET", path: "/v1/vms", handler: listVms },
  { method: "POST", path: "/v1/vms", handler: createVm },
  { method: "GET", path: "/v1/vms/{id}", handler: getVm },
  { method: "DELETE", path: "/v1/vms/{id}", handler: deleteVm },
  { method: "POST", path: "/v1/vms/{id}/ping", handler: pingVm },
  { method: "POST", path: "/v1/vms/{id}/exec", handler: execOnVm },
  { method: "WS", path: "/v1/vms/{id}/exec", stream: execStream },
  { method: "GET", path: "/v1/vms/{id}/files", handler: readFileRoute },
  { method: "PUT", path: "/v1/vms/{id}/files", handler: writeFileRoute },
  { method: "POST", path: "/v1/vms/{id}/fs", handler: fsCallRoute },
  { method: "WS", path: "/v1/vms/{id}/fs/watch", stream: watchStream },
  { method: "WS", path: "/v1/vms/{id}/ports/{port}/tcp", stream: tcpStream },
  { method: "*", path: "/v1/vms/{id}/ports/{port}/http/{rest*}", handler: proxyHttp },
];

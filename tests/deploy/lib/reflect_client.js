// A gRPC client that knows no .proto file: it asks the server's reflection service
// (grpc.reflection.v1alpha, which gRPC C++ 1.51's ProtoServerReflectionPlugin serves) for the
// descriptors and calls methods with JSON objects in the proto3 JSON mapping: lowerCamelCase field
// names (the proto names are accepted on input too), 64-bit integers as decimal strings, enums by
// name, maps as objects.
//
// protobufjs builds map fields from descriptors as `repeated XxxEntry` messages; fixMapFields()
// turns them back into real map fields so that maps read and write as JSON objects.
//
//   const { ReflectClient } = require('./lib/reflect_client');
//   const c = await ReflectClient.connect('127.0.0.1:7480');
//   await c.services();                               // ['dmapin.v1.Admin', ...]
//   await c.call('dmapin.v1.Admin', 'ListNodes', {}); // plain object
'use strict';

const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');
const { Client: ReflectionClient } = require('grpc-reflection-js');

// gRPC C++'s default health service (grpc.health.v1.Health) is listed by reflection but its
// descriptor is not in the server's descriptor pool (the service is hand-written, not generated),
// so file_containing_symbol answers NOT_FOUND for it; grpcurl has the same problem. This is the
// public grpc.health.v1 protocol, used only for that service when reflection cannot resolve it.
const HEALTH_V1 = {
  nested: {
    grpc: { nested: { health: { nested: { v1: { nested: {
      HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
      HealthCheckResponse: {
        fields: { status: { type: 'ServingStatus', id: 1 } },
        nested: { ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } } },
      },
      Health: {
        methods: {
          Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' },
          Watch: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse', responseStream: true },
        },
      },
    } } } } } },
  },
};

const TO_OBJECT = { longs: String, enums: String, defaults: true, arrays: true, objects: true };

function lowerCamel(name) {
  return name.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase());
}

// Replaces each `repeated FooEntry foo` whose FooEntry is a nested map-entry-shaped message (fields
// key = 1 and value = 2) with a protobufjs MapField, everywhere under `ns`.
function fixMapFields(ns) {
  for (const nested of ns.nestedArray || []) {
    if (nested instanceof protobuf.Type) {
      for (const field of nested.fieldsArray.slice()) {
        if (!field.repeated) continue;
        const entryName = field.name.split('_').map((p) => p.charAt(0).toUpperCase() + p.slice(1))
          .join('') + 'Entry';
        const entry = nested.nested && nested.nested[entryName];
        if (!(entry instanceof protobuf.Type)) continue;
        const key = entry.fieldsById[1];
        const value = entry.fieldsById[2];
        if (!key || !value || key.name !== 'key' || value.name !== 'value') continue;
        nested.remove(field);
        nested.add(new protobuf.MapField(field.name, field.id, key.type, value.type));
      }
    }
    if (nested.nestedArray) fixMapFields(nested);
  }
}

// JSON (lowerCamelCase or proto names) -> the object protobufjs' fromObject expects (proto names).
function jsonIn(type, obj) {
  if (obj === null || typeof obj !== 'object') return obj;
  const out = {};
  for (const [k, v] of Object.entries(obj)) {
    const field = type.fields[k] || type.fieldsArray.find((f) => lowerCamel(f.name) === k);
    if (!field) throw new Error(`${type.fullName} has no field ${k}`);
    field.resolve();
    const sub = field.resolvedType instanceof protobuf.Type ? field.resolvedType : null;
    if (!sub) {
      out[field.name] = v;
    } else if (field.map) {
      out[field.name] = Object.fromEntries(Object.entries(v || {}).map(([mk, mv]) => [mk, jsonIn(sub, mv)]));
    } else if (field.repeated) {
      out[field.name] = (v || []).map((e) => jsonIn(sub, e));
    } else {
      out[field.name] = jsonIn(sub, v);
    }
  }
  return out;
}

// protobufjs' toObject result (proto names) -> proto3 JSON names (lowerCamelCase).
function jsonOut(type, obj) {
  if (obj === null || typeof obj !== 'object') return obj;
  const out = {};
  for (const [k, v] of Object.entries(obj)) {
    const field = type.fields[k];
    if (!field) continue;
    const sub = field.resolvedType instanceof protobuf.Type ? field.resolvedType : null;
    let value = v;
    if (sub && field.map) {
      value = Object.fromEntries(Object.entries(v || {}).map(([mk, mv]) => [mk, jsonOut(sub, mv)]));
    } else if (sub && field.repeated) {
      value = (v || []).map((e) => jsonOut(sub, e));
    } else if (sub) {
      value = jsonOut(sub, v);
    }
    out[lowerCamel(field.name)] = value;
  }
  return out;
}

class ReflectClient {
  constructor(target, reflection) {
    this.target = target;
    this.reflection = reflection;
    this.roots = new Map(); // service name -> protobufjs Root
    this.stubs = new Map(); // service name -> grpc.Client
    this.builtin = new Set(); // services resolved from HEALTH_V1 instead of reflection
  }

  static async connect(target) {
    const reflection = new ReflectionClient(target, grpc.credentials.createInsecure());
    return new ReflectClient(target, reflection);
  }

  // Names of the services the server exposes through reflection.
  async services() {
    return (await this.reflection.listServices()).slice().sort();
  }

  // The protobufjs Service of `serviceName`, resolved through reflection.
  async service(serviceName) {
    if (!this.roots.has(serviceName)) {
      let root;
      try {
        root = await this.reflection.fileContainingSymbol(serviceName);
      } catch (e) {
        if (serviceName !== 'grpc.health.v1.Health') {
          throw new Error(`reflection cannot resolve ${serviceName}: ${e.details || e.message || 'NOT_FOUND'}`);
        }
        root = protobuf.Root.fromJSON(HEALTH_V1);
        this.builtin.add(serviceName);
      }
      fixMapFields(root);
      root.resolveAll();
      this.roots.set(serviceName, root);
    }
    const service = this.roots.get(serviceName).lookupService(serviceName);
    service.resolveAll();
    return service;
  }

  // { methodName: { requestType, responseType, requestStream, responseStream } }.
  async methods(serviceName) {
    const service = await this.service(serviceName);
    const out = {};
    for (const [name, m] of Object.entries(service.methods)) {
      out[name] = {
        requestType: m.resolvedRequestType.fullName.replace(/^\./, ''),
        responseType: m.resolvedResponseType.fullName.replace(/^\./, ''),
        requestStream: !!m.requestStream,
        responseStream: !!m.responseStream,
      };
    }
    return out;
  }

  async stub(serviceName) {
    if (!this.stubs.has(serviceName)) {
      const service = await this.service(serviceName);
      const definition = {};
      for (const [name, m] of Object.entries(service.methods)) {
        const req = m.resolvedRequestType;
        const res = m.resolvedResponseType;
        definition[name] = {
          path: `/${serviceName}/${name}`,
          requestStream: !!m.requestStream,
          responseStream: !!m.responseStream,
          requestSerialize: (obj) => Buffer.from(req.encode(req.fromObject(jsonIn(req, obj))).finish()),
          requestDeserialize: (buf) => jsonOut(req, req.toObject(req.decode(buf), TO_OBJECT)),
          responseSerialize: (obj) => Buffer.from(res.encode(res.fromObject(jsonIn(res, obj))).finish()),
          responseDeserialize: (buf) => jsonOut(res, res.toObject(res.decode(buf), TO_OBJECT)),
        };
      }
      const Ctor = grpc.makeGenericClientConstructor(definition, serviceName);
      this.stubs.set(serviceName, new Ctor(this.target, grpc.credentials.createInsecure()));
    }
    return this.stubs.get(serviceName);
  }

  // Unary call with a JSON-like request; resolves to the response object, rejects with the
  // grpc-js error (err.code, err.details).
  async call(serviceName, method, request, { timeoutMs = 10000 } = {}) {
    const stub = await this.stub(serviceName);
    if (typeof stub[method] !== 'function') {
      throw new Error(`${serviceName} has no method ${method}`);
    }
    return new Promise((resolve, reject) => {
      stub[method](request, { deadline: Date.now() + timeoutMs }, (err, res) =>
        err ? reject(err) : resolve(res));
    });
  }

  close() {
    for (const s of this.stubs.values()) s.close();
    this.reflection.grpcClient.close();
  }
}

// Calls `fn` until it returns a truthy value or `timeoutMs` passes; returns the last value.
async function eventually(fn, { timeoutMs = 20000, intervalMs = 100 } = {}) {
  const end = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
    } catch (e) {
      last = undefined;
    }
    if (last || Date.now() > end) return last;
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

module.exports = { ReflectClient, eventually, grpc };

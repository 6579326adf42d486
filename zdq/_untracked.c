/* zdq._untracked: objects the garbage collector does not walk (see zdq/client/window.py, MapFuture).
 *
 * queue_pool.map returns a future per item: a million items are a million small objects that stay
 * alive until their results are read. CPython's collector walks every live tracked object in each
 * of its full collections (seven during a map of a million items), which cost the map three times
 * what its tasks did. A map's future holds nothing but its chunk and its index; while the chunk
 * holds nothing that could lead back to a future (plain scalars as its outcomes, see MapChunk),
 * no reference cycle can pass through the futures, and the collector need not see them, as
 * CPython itself leaves tuples and dicts of atoms untracked until they hold more.
 *
 * slotted(cls, n, slot_a, value_a, slot_b, values_b) makes n instances of cls as object.__new__
 * does (no __init__), sets slot_a to value_a in each and slot_b to values_b[i] in the i-th, and
 * leaves them untracked. track(obj) and track_all(list) hand objects back to the collector (a
 * no-op for one that is tracked already, or that the collector does not handle).
 * scalars(sequence) says whether every item is of exactly int, float, complex, str, bytes, bool or
 * NoneType: objects that hold no references.
 *
 * Optional: without a C compiler at install, zdq makes the same objects in Python, tracked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* The byte offset of an object slot of `cls` (a member descriptor of one of its bases). */
static Py_ssize_t
slot_offset(PyTypeObject *cls, PyObject *descr)
{
    if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "slotted() needs a slot's descriptor, got %R", descr);
        return -1;
    }
    PyMemberDescrObject *member = (PyMemberDescrObject *)descr;
    if (!PyType_IsSubtype(cls, PyDescr_TYPE(member))) {
        PyErr_Format(PyExc_TypeError, "slotted(): %R is not a slot of %R", descr, (PyObject *)cls);
        return -1;
    }
    if (member->d_member->type != T_OBJECT_EX || (member->d_member->flags & READONLY)) {
        PyErr_Format(PyExc_TypeError, "slotted(): %R is not a writable object slot", descr);
        return -1;
    }
    return member->d_member->offset;
}

static PyObject *
slotted(PyObject *module, PyObject *args)
{
    PyTypeObject *cls;
    Py_ssize_t n;
    PyObject *slot_a, *value_a, *slot_b, *values_b;
    if (!PyArg_ParseTuple(args, "O!nOOOO:slotted", &PyType_Type, &cls, &n, &slot_a, &value_a, &slot_b, &values_b)) {
        return NULL;
    }
    if (cls->tp_new != PyBaseObject_Type.tp_new || !PyType_IS_GC(cls)) {
        PyErr_Format(PyExc_TypeError, "slotted(): %R must be made by object.__new__ and collected", (PyObject *)cls);
        return NULL;
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "slotted(): n must be >= 0");
        return NULL;
    }
    Py_ssize_t offset_a = slot_offset(cls, slot_a);
    if (offset_a < 0) {
        return NULL;
    }
    Py_ssize_t offset_b = slot_offset(cls, slot_b);
    if (offset_b < 0) {
        return NULL;
    }
    if (offset_a == offset_b) {
        PyErr_SetString(PyExc_ValueError, "slotted(): two different slots are needed");
        return NULL;
    }
    /* A tuple of its own (the same one when it is given a tuple): a list could be changed by code
     * that the allocations below run (a collection's finalizers) while its items are read. */
    PyObject *seq = PySequence_Tuple(values_b);
    if (seq == NULL) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(seq) < n) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "slotted(): %zd values for %zd objects", PyTuple_GET_SIZE(seq), n);
        return NULL;
    }
    /* The objects are made into an array of this function's own, and the list is made only once
     * they all exist: each allocation may run a collection, and with it gc.callbacks and
     * finalizers, which must never find a list whose items are not filled in yet. */
    PyObject **made = PyMem_New(PyObject *, n > 0 ? n : 1);
    PyObject *empty = made == NULL ? NULL : PyTuple_New(0);
    if (empty == NULL) {
        PyMem_Free(made);
        Py_DECREF(seq);
        return made == NULL ? PyErr_NoMemory() : NULL;
    }
    PyObject **values = ((PyTupleObject *)seq)->ob_item;
    Py_ssize_t i = 0;
    for (; i < n; i++) {
        /* object.__new__(cls): the instance's dict and weak references set up as for any other. */
        PyObject *obj = PyBaseObject_Type.tp_new(cls, empty, NULL);
        if (obj == NULL) {
            break;
        }
        Py_INCREF(value_a);
        *(PyObject **)((char *)obj + offset_a) = value_a;
        Py_INCREF(values[i]);
        *(PyObject **)((char *)obj + offset_b) = values[i];
        if (PyObject_GC_IsTracked(obj)) {
            PyObject_GC_UnTrack(obj);
        }
        made[i] = obj;
    }
    PyObject *out = i == n ? PyList_New(n) : NULL;
    if (out == NULL) {
        for (Py_ssize_t j = 0; j < i; j++) {
            Py_DECREF(made[j]);
        }
    }
    else {
        for (Py_ssize_t j = 0; j < n; j++) {  /* no allocation, no Python code: nothing runs between */
            PyList_SET_ITEM(out, j, made[j]);
        }
    }
    PyMem_Free(made);
    Py_DECREF(empty);
    Py_DECREF(seq);
    return out;
}

/* Hand obj back to the collector: only an object the collector handles (PyObject_IS_GC asks the
 * type's tp_is_gc too: a static type is not one) and that it does not track already. */
static void
track_one(PyObject *obj)
{
    if (PyObject_IS_GC(obj) && !PyObject_GC_IsTracked(obj)) {
        PyObject_GC_Track(obj);
    }
}

static PyObject *
track(PyObject *module, PyObject *obj)
{
    track_one(obj);
    Py_RETURN_NONE;
}

static PyObject *
track_all(PyObject *module, PyObject *objects)
{
    if (!PyList_CheckExact(objects)) {
        PyErr_Format(PyExc_TypeError, "track_all() needs a list, got %R", (PyObject *)Py_TYPE(objects));
        return NULL;
    }
    /* Tracking runs no Python code and allocates nothing: the list cannot change meanwhile. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(objects); i++) {
        track_one(PyList_GET_ITEM(objects, i));
    }
    Py_RETURN_NONE;
}

static PyObject *
scalars(PyObject *module, PyObject *values)
{
    PyObject *seq = PySequence_Fast(values, "scalars() needs a sequence");  /* a list: itself */
    if (seq == NULL) {
        return NULL;
    }
    /* Reading types runs no Python code: the sequence cannot change meanwhile. */
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int plain = 1;
    for (Py_ssize_t i = 0; plain && i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyTypeObject *type = Py_TYPE(items[i]);
        plain = type == &PyLong_Type || type == &PyFloat_Type || type == &PyUnicode_Type || type == &PyBytes_Type
                || type == &PyBool_Type || type == Py_TYPE(Py_None) || type == &PyComplex_Type;
    }
    Py_DECREF(seq);
    return PyBool_FromLong(plain);
}

/* -- slot_result: MapFuture.result() read in C ------------------------------------------------------
 *
 * A map of a million items is read by a million result() calls, one per future: in Python, each is
 * a frame that reads its chunk's state (about 100 ns, a quarter of such a map, benchmarks/RESULTS.md,
 * issue 26's seventeenth session). slot_result(future_type, chunk_slot, index_slot, chunk_type,
 * settled_slot, errors_slot, values_slot, slow) is a method for future_type that answers the
 * common case in C: called without a timeout (or with None) on a future whose position in its
 * chunk is settled and whose chunk holds no error, it returns the chunk's value at that position.
 * Anything else (a pending future, an error anywhere in the chunk, a timeout, an object of a
 * subclass) goes to `slow`, the method in Python, with the same arguments.
 *
 * The slots are read where their member descriptors say, and only from objects of exactly the
 * types they were taken from: a subclass may give one of the names another meaning. The chunk's
 * outcome at a position is written before the position is marked settled, under its lock, and
 * never written again (MapChunk): reading it without the lock, holding the interpreter lock, is
 * as safe as the Python method's reads.
 *
 * The type is a method descriptor (Py_TPFLAGS_METHOD_DESCRIPTOR): `future.result()` calls it with
 * the future first and makes no bound method; `future.result` alone gives a bound method. Its
 * `__wrapped__` is `slow`, and its name, qualified name, module, doc and annotations are slow's,
 * for inspect, help() and typing; it pickles as the attribute of future_type it is.
 */
typedef struct {
    PyObject_HEAD
    PyTypeObject *future_type;
    PyTypeObject *chunk_type;
    Py_ssize_t chunk_at, index_at, settled_at, errors_at, values_at;
    PyObject *slow;
    vectorcallfunc vectorcall;
} SlotResult;

static PyObject *
slot_result_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    SlotResult *self = (SlotResult *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    /* Objects of exactly the types the slots were taken from: a subclass may give one of these
     * names another meaning (a property, a slot of its own), which the Python method honours. */
    if (kwnames == NULL && (nargs == 1 || (nargs == 2 && args[1] == Py_None)) && Py_IS_TYPE(args[0], self->future_type)) {
        char *future = (char *)args[0];
        PyObject *chunk = *(PyObject **)(future + self->chunk_at);
        PyObject *index = *(PyObject **)(future + self->index_at);
        if (chunk != NULL && index != NULL && PyLong_CheckExact(index) && Py_IS_TYPE(chunk, self->chunk_type)) {
            PyObject *settled = *(PyObject **)((char *)chunk + self->settled_at);
            PyObject *errors = *(PyObject **)((char *)chunk + self->errors_at);
            PyObject *values = *(PyObject **)((char *)chunk + self->values_at);
            Py_ssize_t i = PyLong_AsSsize_t(index);
            if (i == -1 && PyErr_Occurred()) {
                PyErr_Clear();
            }
            else if (settled != NULL && errors != NULL && values != NULL && PyByteArray_CheckExact(settled)
                     && PyDict_CheckExact(errors) && PyList_CheckExact(values) && i >= 0
                     && i < PyByteArray_GET_SIZE(settled) && i < PyList_GET_SIZE(values)
                     && PyByteArray_AS_STRING(settled)[i] && PyDict_GET_SIZE(errors) == 0) {
                PyObject *value = PyList_GET_ITEM(values, i);
                Py_INCREF(value);
                return value;
            }
        }
    }
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static Py_ssize_t
member_offset(PyTypeObject *owner, PyObject *descr, const char *what)
{
    if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "slot_result(): %s must be a slot's descriptor, got %R", what, descr);
        return -1;
    }
    PyMemberDescrObject *member = (PyMemberDescrObject *)descr;
    if (!PyType_IsSubtype(owner, PyDescr_TYPE(member)) || member->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "slot_result(): %s, %R, is not an object slot of %R", what, descr, (PyObject *)owner);
        return -1;
    }
    return member->d_member->offset;
}

static PyObject *
slot_result_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyTypeObject *future_type, *chunk_type;
    PyObject *chunk_slot, *index_slot, *settled_slot, *errors_slot, *values_slot, *slow;
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)
        || !PyArg_ParseTuple(args, "O!OOO!OOOO:slot_result", &PyType_Type, &future_type, &chunk_slot, &index_slot,
                             &PyType_Type, &chunk_type, &settled_slot, &errors_slot, &values_slot, &slow)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "slot_result() takes no keyword arguments");
        }
        return NULL;
    }
    if (!PyCallable_Check(slow)) {
        PyErr_Format(PyExc_TypeError, "slot_result(): slow must be callable, got %R", slow);
        return NULL;
    }
    Py_ssize_t at[5];
    PyTypeObject *owners[5] = {future_type, future_type, chunk_type, chunk_type, chunk_type};
    PyObject *slots[5] = {chunk_slot, index_slot, settled_slot, errors_slot, values_slot};
    const char *names[5] = {"chunk_slot", "index_slot", "settled_slot", "errors_slot", "values_slot"};
    for (int k = 0; k < 5; k++) {
        at[k] = member_offset(owners[k], slots[k], names[k]);
        if (at[k] < 0) {
            return NULL;
        }
    }
    SlotResult *self = (SlotResult *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    Py_INCREF(future_type);
    self->future_type = future_type;
    Py_INCREF(chunk_type);
    self->chunk_type = chunk_type;
    self->chunk_at = at[0];
    self->index_at = at[1];
    self->settled_at = at[2];
    self->errors_at = at[3];
    self->values_at = at[4];
    Py_INCREF(slow);
    self->slow = slow;
    self->vectorcall = slot_result_call;
    return (PyObject *)self;
}

static int
slot_result_traverse(SlotResult *self, visitproc visit, void *arg)
{
    Py_VISIT(self->future_type);
    Py_VISIT(self->chunk_type);
    Py_VISIT(self->slow);
    return 0;
}

static int
slot_result_clear(SlotResult *self)
{
    Py_CLEAR(self->future_type);
    Py_CLEAR(self->chunk_type);
    Py_CLEAR(self->slow);
    return 0;
}

static void
slot_result_dealloc(SlotResult *self)
{
    PyObject_GC_UnTrack(self);
    slot_result_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
slot_result_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {  /* read from the class: the method itself */
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

static PyObject *
slot_result_doc(SlotResult *self, void *closure)
{
    return self->slow == NULL ? (Py_INCREF(Py_None), Py_None) : PyObject_GetAttrString(self->slow, "__doc__");
}

/* An attribute of `slow` (closure: its name), as the method's own. */
static PyObject *
slot_result_slows(SlotResult *self, void *closure)
{
    if (self->slow == NULL) {
        PyErr_SetString(PyExc_AttributeError, (const char *)closure);
        return NULL;
    }
    return PyObject_GetAttrString(self->slow, (const char *)closure);
}

/* What the method holds, read-only: `slow` (for inspect.signature and help()) and its class. */
static PyMemberDef slot_result_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(SlotResult, slow), READONLY, "the method in Python, which answers what is not settled"},
    {"__objclass__", T_OBJECT, offsetof(SlotResult, future_type), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef slot_result_getset[] = {
    {"__doc__", (getter)slot_result_doc, NULL, NULL, NULL},
    {"__name__", (getter)slot_result_slows, NULL, NULL, "__name__"},
    {"__qualname__", (getter)slot_result_slows, NULL, NULL, "__qualname__"},
    {"__module__", (getter)slot_result_slows, NULL, NULL, "__module__"},
    {"__annotations__", (getter)slot_result_slows, NULL, NULL, "__annotations__"},
    {NULL, NULL, NULL, NULL, NULL},
};

/* Pickled as what it is: the attribute `result` (slow's name) of future_type. */
static PyObject *
slot_result_reduce(SlotResult *self, PyObject *unused)
{
    if (self->future_type == NULL || self->slow == NULL) {
        PyErr_SetString(PyExc_TypeError, "cannot pickle a cleared slot_result");
        return NULL;
    }
    PyObject *name = PyObject_GetAttrString(self->slow, "__name__");
    if (name == NULL) {
        return NULL;
    }
    PyObject *getattr = PyDict_GetItemString(PyEval_GetBuiltins(), "getattr");  /* borrowed */
    PyObject *out = getattr == NULL ? NULL : Py_BuildValue("O(OO)", getattr, (PyObject *)self->future_type, name);
    if (getattr == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no builtin getattr");
    }
    Py_DECREF(name);
    return out;
}

static PyMethodDef slot_result_methods[] = {
    {"__reduce__", (PyCFunction)slot_result_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SlotResultType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zdq._untracked.slot_result",
    .tp_basicsize = sizeof(SlotResult),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = slot_result_new,
    .tp_traverse = (traverseproc)slot_result_traverse,
    .tp_clear = (inquiry)slot_result_clear,
    .tp_dealloc = (destructor)slot_result_dealloc,
    .tp_vectorcall_offset = offsetof(SlotResult, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = slot_result_get,
    .tp_getset = slot_result_getset,
    .tp_methods = slot_result_methods,
    .tp_members = slot_result_members,
};

static PyMethodDef methods[] = {
    {"slotted", slotted, METH_VARARGS,
     "slotted(cls, n, slot_a, value_a, slot_b, values_b): n untracked instances of cls, slot_a set to value_a, "
     "slot_b to values_b[i]"},
    {"track", track, METH_O, "track(obj): hand obj back to the garbage collector (if it is not tracked)"},
    {"track_all", track_all, METH_O, "track_all(objects): track(obj) for each of a list"},
    {"scalars", scalars, METH_O, "scalars(values): whether every item of a sequence is an int, float, complex, str, bytes, bool or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "zdq._untracked", "Objects the garbage collector does not walk (MapFuture).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__untracked(void)
{
    if (PyType_Ready(&SlotResultType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&SlotResultType);
    if (PyModule_AddObject(m, "slot_result", (PyObject *)&SlotResultType) < 0) {
        Py_DECREF(&SlotResultType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
